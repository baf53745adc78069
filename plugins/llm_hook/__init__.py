"""Airflow hook and client for batch LLM services."""
