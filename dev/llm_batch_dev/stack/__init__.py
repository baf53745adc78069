"""The embedded local stack: a MongoDB-wire server, the LLM simulator and Airflow, on localhost."""
