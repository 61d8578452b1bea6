"""Export: merge, GGUF conversion and quantisation, Modelfile, round-trip verification."""
