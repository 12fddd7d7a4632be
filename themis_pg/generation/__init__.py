"""Generation with llama.cpp and the prompt logic around it."""
