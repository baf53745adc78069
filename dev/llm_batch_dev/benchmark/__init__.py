"""The benchmark: a 5000-task job measured against its orchestration and LLM floors."""
