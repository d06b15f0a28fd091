"""How a pipeline's tasks are dressed for where they run: nothing for kfp's local runner; on a cluster, the
secrets, the pod's resources, retries and caching; in the GPU variant, a GPU and the GPU pool for the training
tasks.

The GPU variant is a separately compiled pipeline (``*-gpu.yaml``) because whether a pod asks for a GPU cannot
depend on a run-time parameter; ``scalekd pipeline submit`` picks it when ``gpu=true`` and no ``ray_address`` is
given. With ``ray_address`` a training pod only submits a Ray job: the GPUs belong to the RayCluster's worker group
(k8s/), so the pod stays small.
"""

from __future__ import annotations

import copy

from kfp import dsl

S3_SECRET = "scalekd-s3"  # k8s/secret-s3.example.yaml
S3_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
          "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}
RAY_TOKEN_SECRET = "scalekd-ray-token"  # k8s/secret-ray-token.example.yaml; KubeRay's authOptions.secretName
RAY_CLIENT_LABEL = ("scalekd.io/ray-client", "true")  # admitted to the Jobs API by k8s/networkpolicy.yaml

# Pipeline parameters of the compiled pipelines, with their defaults: the training pods' size...
TRAINING_POD = {"cpu_request": (str, "2"), "cpu_limit": (str, "4"), "memory_request": (str, "8G"),
                "memory_limit": (str, "16G")}
# ...and, in the GPU variant, the accelerator and the pool's node selector and toleration.
GPU_POOL = {"accelerator_type": (str, "nvidia.com/gpu"),
            "gpu_node_selector": (dict, {"nvidia.com/gpu.present": "true"}),
            "gpu_toleration": (dict, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})}
LIGHT_POD = ("500m", "1", "1G", "2G")  # config, data checks, evaluation, export: cpu and memory, request and limit
# A retried training task resumes from its last checkpoint. The first retry comes after the lost pod's lease on
# its output has lapsed (scalekd.outputs: 120 s), so the retry is not refused as a second run.
RETRY = {"num_retries": 2, "backoff_duration": "150s", "backoff_factor": 2.0}


class Pods:
    """The settings for one target: ``cluster`` (secrets, resources, retries) and ``gpu`` (the GPU variant)."""

    def __init__(self, cluster: bool, gpu: bool = False):
        self.cluster, self.gpu = cluster, gpu and cluster

    def parameters(self) -> dict:
        """The pipeline parameters these settings read (copies: kfp's compiler reorders a dict default in place)."""
        return copy.deepcopy({**(TRAINING_POD if self.cluster else {}), **(GPU_POOL if self.gpu else {})})

    def light(self, task: dsl.PipelineTask, cached: bool = True) -> dsl.PipelineTask:
        """A small task. ``cached`` only where its inputs name their content (the config from parameters); a task
        that reads a dataset by URI (``.../latest`` changes under the same name) runs every time."""
        task.set_caching_options(cached)
        if not self.cluster:
            return task
        cpu, cpu_limit, memory, memory_limit = LIGHT_POD
        task.set_cpu_request(cpu).set_cpu_limit(cpu_limit).set_memory_request(memory).set_memory_limit(memory_limit)
        return self._secrets(task)

    def training(self, task: dsl.PipelineTask, v: dict) -> dsl.PipelineTask:
        """A training task: never cached by kfp (our stages reuse finished work by the content of their inputs),
        sized by the pipeline's parameters, retried, and in the GPU variant given a GPU on the GPU pool."""
        task.set_caching_options(False)
        if not self.cluster:
            return task
        task.set_cpu_request(v["cpu_request"]).set_cpu_limit(v["cpu_limit"])
        task.set_memory_request(v["memory_request"]).set_memory_limit(v["memory_limit"])
        task.set_retry(**RETRY)
        if self.gpu:
            from kfp import kubernetes

            task.set_accelerator_type(v["accelerator_type"]).set_accelerator_limit(1)
            kubernetes.add_node_selector_json(task, v["gpu_node_selector"])
            kubernetes.add_toleration_json(task, v["gpu_toleration"])
        return self._secrets(task)

    @staticmethod
    def _secrets(task: dsl.PipelineTask) -> dsl.PipelineTask:
        """S3 credentials and the Ray cluster's token from their secrets (never in the spec), and the label the
        NetworkPolicy admits to the Jobs API."""
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_ENV)
        kubernetes.use_secret_as_env(task, secret_name=RAY_TOKEN_SECRET,
                                     secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"})
        return kubernetes.add_pod_label(task, *RAY_CLIENT_LABEL)
