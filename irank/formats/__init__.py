"""One owner per file format: manifests, tensor rows, the scores table, the review pack, summaries, atomic writes."""
