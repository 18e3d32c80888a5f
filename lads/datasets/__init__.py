"""Datasets: readers (REFER, TransVG split files, JSONL), the synthetic benchmark, transforms."""
