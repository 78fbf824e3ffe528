"""Remote OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server) behind the engine's surface."""
