"""Logs, traces and a metrics port for a ledgerflow process, set up from Settings."""
