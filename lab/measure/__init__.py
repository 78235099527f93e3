"""What was measured and how it is shown: the Timeline and its figures (metrics), the offline quality guardrail
(quality), the crash-safe JSONL history (history), and tables, CSV, charts and result files (report)."""
