output "node_pool" {
  description = "The node pool's name."
  value       = google_container_node_pool.training.name
}

output "executor_env" {
  description = "Server settings that send training Jobs to this pool (deploy/k8s/server.yaml ConfigMap)."
  value = {
    EDGELOOP_K8S_NODE_SELECTOR = jsonencode(local.pool_label)
    EDGELOOP_K8S_GPU_COUNT     = tostring(var.accelerator_count)
    EDGELOOP_K8S_GPU_RESOURCE  = "nvidia.com/gpu"
  }
}
