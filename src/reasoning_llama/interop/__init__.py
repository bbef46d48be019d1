"""Moving weights between reasoning-llama and the HF ecosystem."""
