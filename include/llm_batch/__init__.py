"""LLM batch jobs over MongoDB documents: the business logic behind the DAGs."""
