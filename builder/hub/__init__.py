"""Publishing artifacts to the Hugging Face Hub (`publish`) and a local Hub-compatible registry (`server`)."""
