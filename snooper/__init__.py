"""The snooper: capture on the mirror port, dedupe, batch into MongoDB."""
