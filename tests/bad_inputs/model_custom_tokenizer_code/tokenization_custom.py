raise RuntimeError("code from a model folder was run")
