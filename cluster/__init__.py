"""Cluster deployment files: Ray cluster launcher config, KubeRay manifests and their renderer, dashboards."""
