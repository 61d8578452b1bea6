// ollamarender renders chat conversations with an Ollama TEMPLATE using Go's text/template,
// giving templates the values Ollama gives them, so that tunefix can check its Jinja
// templates against what Ollama will actually send to the model.
//
// Input (stdin): a JSON array of jobs {"template", "messages": [{"role","content",
// "thinking"}], "system", "think"}. "system" plays the Modelfile's SYSTEM: it is prepended
// as a system message when the conversation has none. "think" is the request's think switch:
// null (unset) gives .Think false and .IsThinkSet false, true/false give .Think that value and
// .IsThinkSet true (Ollama's server/prompt.go). Output (stdout): a JSON array of {"text"} or
// {"error"}.
//
// Written for tunefix from Ollama's documented behaviour (stdlib only, no Ollama code):
//   - templates are parsed with missingkey=zero and a "json" function;
//   - consecutive messages of the same role (tools excepted) are merged, contents joined
//     with a blank line; every system message is also collected into .System (joined
//     with a blank line) while staying in .Messages;
//   - a template that does not mention .Messages is an old-style one (.Prompt/.Response
//     per turn); tunefix does not emit those and this program refuses them.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// Message mirrors the fields of Ollama's api.Message that templates may read, so that a
// template touching .ToolCalls or .Images executes instead of failing on a missing field.
type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking,omitempty"`
	Images    []any  `json:"images,omitempty"`
	ToolCalls []any  `json:"tool_calls,omitempty"`
	ToolName  string `json:"tool_name,omitempty"`
}

type job struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
	Think    *bool     `json:"think"`
}

type result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// mentions reports whether any field or variable in the tree is named name (any case).
func mentions(n parse.Node, name string) bool {
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return false
		}
		for _, c := range n.Nodes {
			if mentions(c, name) {
				return true
			}
		}
	case *parse.ActionNode:
		return mentions(n.Pipe, name)
	case *parse.TemplateNode:
		return n.Pipe != nil && mentions(n.Pipe, name)
	case *parse.IfNode:
		return mentions(&n.BranchNode, name)
	case *parse.RangeNode:
		return mentions(&n.BranchNode, name)
	case *parse.WithNode:
		return mentions(&n.BranchNode, name)
	case *parse.BranchNode:
		return mentions(n.Pipe, name) || mentions(n.List, name) || (n.ElseList != nil && mentions(n.ElseList, name))
	case *parse.PipeNode:
		if n == nil {
			return false
		}
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				if mentions(a, name) {
					return true
				}
			}
		}
	case *parse.FieldNode:
		return hasIdent(n.Ident, name)
	case *parse.VariableNode:
		return hasIdent(n.Ident, name)
	case *parse.ChainNode:
		return hasIdent(n.Field, name) || mentions(n.Node, name)
	}
	return false
}

func hasIdent(idents []string, name string) bool {
	for _, id := range idents {
		if strings.EqualFold(id, name) {
			return true
		}
	}
	return false
}

// collate merges consecutive same-role messages and gathers the system prompt.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, &m)
	}
	return strings.Join(system, "\n\n"), out
}

func render(j job) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(j.Template)
	if err != nil {
		return "", err
	}
	if !mentions(tmpl.Tree.Root, "Messages") {
		return "", fmt.Errorf("old-style template (no .Messages): not supported by tunefix")
	}
	msgs := j.Messages
	if j.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: j.System}}, msgs...)
	}
	system, collated := collate(msgs)
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   collated,
		"Tools":      nil,
		"Response":   "",
		"Think":      j.Think != nil && *j.Think,
		"ThinkLevel": "",
		"IsThinkSet": j.Think != nil,
	})
	return b.String(), err
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		fmt.Fprintln(os.Stderr, "ollamarender: bad input:", err)
		os.Exit(2)
	}
	results := make([]result, len(jobs))
	for i, j := range jobs {
		text, err := render(j)
		if err != nil {
			results[i].Error = err.Error()
		} else {
			results[i].Text = &text
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "ollamarender:", err)
		os.Exit(1)
	}
}
