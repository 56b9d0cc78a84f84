"""Kubernetes: the device plugin (gpuwatch.io/gpu, gpuwatch.io/memory), the kubelet's PodResources client and the
resolver that gives each container of a pod its quota (kube/node.py puts them together for the daemon)."""
