"""Eval suites run through the gateway and judged against release gates (`loraplex eval`)."""
