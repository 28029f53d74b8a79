"""What ``tl test`` writes: metrics and CSV/PNG files (`files`), the self-contained report.html
(`html`) and the learning curves both draw (`curves`)."""
