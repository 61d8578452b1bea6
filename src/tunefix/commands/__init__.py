"""The command layer: each ``tunefix`` command's options (one typed dataclass) and its
handler (options in, a library call with those options or plain arguments, the terminal
rendering, an exit status out). ``build`` turns the dataclasses into argparse parsers;
``tunefix.cli`` wires them into the ``tunefix`` command. Library modules never import this
package, and argparse's parse results stop here (``build.options_from``).
"""
