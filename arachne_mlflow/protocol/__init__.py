"""The Open Inference Protocol (KServe V2) as both ends speak it: datatypes, the tensor codec, model names."""
