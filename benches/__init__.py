"""pytest-benchmark suites of xlard.ops; `python -m benches.report` prints the ratio table."""
