"""The lab's tools: reproduce, compare, report, analyze, stats, demo."""
