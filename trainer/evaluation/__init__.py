"""The evaluation stage: metrics, evaluation runs on torch and every artifact, reference statistics, the release gate and the model card."""
