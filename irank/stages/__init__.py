"""The stages, side by side: each reads its files, calls the model layer and the core, writes its files.

A stage never imports another stage."""
