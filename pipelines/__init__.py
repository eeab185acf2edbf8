"""Kubeflow Pipelines (KFP v2) definition of the ATMask ablation pipeline."""
