"""Hand-off to cluster engines: `distml export k8s` writes the manifests that run a distml pipeline
on Kubernetes (Argo Workflows, Kubeflow Trainer, KServe, Kueue) from the same Python pipeline."""
