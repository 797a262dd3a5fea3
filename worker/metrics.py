"""Worker metrics, named after Triton's where the meaning is the same (docs/design.md §6)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

REQUEST_SUCCESS = Counter("cvserve_inference_request_success", "Jobs answered with a result",
                          ["model"])
REQUEST_FAILURE = Counter("cvserve_inference_request_failure", "Jobs answered with an error",
                          ["model", "code"])
EXECUTIONS = Counter("cvserve_inference_exec", "Batches run by the model", ["model"])
BATCH_SIZE = Histogram("cvserve_inference_batch_size", "Jobs per model execution", ["model"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
QUEUE_SECONDS = Histogram("cvserve_inference_queue_duration_seconds",
                          "Enqueue to start of the job's batch, less preprocessing", ["model"],
                          buckets=_LATENCY)
INPUT_SECONDS = Histogram("cvserve_inference_compute_input_duration_seconds",
                          "Decode and preprocess per job", ["model"], buckets=_LATENCY)
INFER_SECONDS = Histogram("cvserve_inference_compute_infer_duration_seconds",
                          "Model execution per batch", ["model"], buckets=_LATENCY)
OUTPUT_SECONDS = Histogram("cvserve_inference_compute_output_duration_seconds",
                           "Postprocess and encode per job", ["model"], buckets=_LATENCY)
CANCELLED = Counter("cvserve_inference_cancelled", "Jobs dropped before the model ran them",
                    ["model", "reason"])  # reason: client_disconnected | deadline
BATCH_THROUGHPUT = Gauge("cvserve_batch_throughput_images_per_second",
                         "Warm-up measurement: images/s at each batch size",
                         ["model", "batch_size"])
POLICY_MAX_BATCH = Gauge("cvserve_batch_policy_max_batch_size",
                         "The largest batch the policy forms", ["model"])
POLICY_DELAY = Gauge("cvserve_batch_policy_max_queue_delay_ms",
                     "How long a batch waits for more jobs", ["model"])
