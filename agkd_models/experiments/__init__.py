"""What the commands run: the pipeline (build from a configuration, train, distil, cache,
evaluate), method comparisons over seeds, reports and the review's metrics."""
