"""The child side of ``tunefix.llamacpp``: one llama.cpp model, driven over a pipe.

Run as ``python -m tunefix._llama_child READ_FD WRITE_FD``. Requests are ``(op, args)``
pickles; each gets ``("ok", value)`` or ``("error", text)``. The child ends when the
parent closes its end. Nothing here is imported by the parent: a llama.cpp crash (an
instruction the CPU refuses, an out-of-memory kill) ends this process only.

``TUNEFIX_TEST_LLAMA_CRASH=HOW[:TEXT][,...]`` (tests only) makes the child die when it opens
a model whose path contains TEXT: ``signal`` with SIGILL (what an AMX kernel does on a
machine that refuses AMX), ``oom`` with SIGKILL (what the out-of-memory killer sends).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

CRASH_SWITCH = "TUNEFIX_TEST_LLAMA_CRASH"


class _State:
    def __init__(self) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = None
        self.logs: list[str] = []

        # llama.cpp has one log callback per process; this process is ours, so it collects
        # every line (llama-cpp-python's own callback hides warnings when verbose=False).
        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):  # noqa: ARG001 - ctypes signature
            self.logs.append(text.decode("utf-8", errors="replace"))

        self._callback = collect  # kept alive: ctypes does not hold a reference
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))


def _crash_on_purpose(path: str) -> None:
    for entry in filter(None, os.environ.get(CRASH_SWITCH, "").split(",")):
        how, _, text = entry.partition(":")
        if text not in path:
            continue
        if how == "oom":
            ballast = bytearray(64 << 20)  # noqa: F841 - some memory in use, as when the killer comes
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGILL)


def op_open(s: _State, path: str, kwargs: dict) -> dict:
    _crash_on_purpose(path)
    s.llm = s.llama_cpp.Llama(path, verbose=False, **kwargs)
    llm, lc = s.llm, s.llama_cpp
    vocab = lc.llama_model_get_vocab(llm.model)
    return {"n_vocab": llm.n_vocab(), "metadata": dict(llm.metadata), "bos": llm.token_bos(),
            "eos": llm.token_eos(), "eog": sorted(i for i in range(llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, i))}


def op_tokenize(s: _State, jobs: list[tuple[str, bool]]) -> list[list[int]]:
    """Each (text, add_bos) with special tokens parsed (as llama.cpp's chat path does)."""
    return [s.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True) for text, add_bos in jobs]


def op_detokenize(s: _State, ids: list[int], special: bool) -> str:
    return s.llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


def op_logits(s: _State, ids: list[int]):
    s.llm.reset()
    s.llm.eval(list(ids))
    return s.llm.scores[: len(ids)].copy()  # [T, V]


def op_greedy(s: _State, ids: list[int], eog: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by argmax of the logits, the last token included when it is an EOG."""
    llm, stop = s.llm, set(eog)
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    while len(out) < max_new_tokens:
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        llm.eval([nxt])
    return out


def op_generate(s: _State, ids: list[int], eog: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding through llama.cpp's sampler (top-k 1), as ``op_greedy`` but for a model
    opened without ``logits_all`` (llama-cpp-python 0.3.36 then keeps no logits to argmax)."""
    stop, out = set(eog), []
    s.llm.reset()
    for token in s.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            break
    return out


def op_logs(s: _State) -> list[str]:
    lines, s.logs = s.logs, []
    return lines


def op_quantize(s: _State, src: str, dst: str, ftype: str, nthread: int) -> int:
    lc = s.llama_cpp
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, "LLAMA_FTYPE_" + ftype)
    params.nthread = nthread
    return int(lc.llama_model_quantize(src.encode(), dst.encode(), params))


def op_system_info(s: _State) -> str:
    return s.llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


OPS = {"open": op_open, "tokenize": op_tokenize, "detokenize": op_detokenize, "logits": op_logits,
       "greedy": op_greedy, "generate": op_generate, "logs": op_logs, "quantize": op_quantize, "system_info": op_system_info}


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the parent handles it and closes the pipe,
    # which ends this loop; a KeyboardInterrupt here would only print a second traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox = Connection(int(argv[1]), writable=False)
    outbox = Connection(int(argv[2]), readable=False)
    state = _State()
    while True:
        try:
            op, args = inbox.recv()
        except EOFError:
            return 0
        try:
            reply = ("ok", OPS[op](state, *args))
        except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it as a TunefixError
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            outbox.send(reply)
        except OSError:  # the parent is gone (killed, or closed its end mid-request)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
