"""Apps that are neither training nor library: the end-to-end demo (`videopoet demo`) and sampling from trained
exports (`videopoet generate`)."""
