variable "project" {
  description = "Google Cloud project of the GKE cluster."
  type        = string
}

variable "location" {
  description = "Region or zone of the GKE cluster."
  type        = string
}

variable "cluster" {
  description = "Name of the existing GKE cluster that runs the edgeloop server."
  type        = string
}

variable "name" {
  description = "Node pool name."
  type        = string
  default     = "edgeloop-training"
}

variable "node_locations" {
  description = "Zones for the pool's nodes (null: the cluster's). Pick zones that have the accelerator."
  type        = list(string)
  default     = null
}

variable "machine_type" {
  description = "Machine type; g2-standard-8 carries one NVIDIA L4."
  type        = string
  default     = "g2-standard-8"
}

variable "accelerator_type" {
  description = "GPU model, e.g. nvidia-l4, nvidia-tesla-t4, nvidia-a100-80gb."
  type        = string
  default     = "nvidia-l4"
}

variable "accelerator_count" {
  description = "GPUs per node; the executor's EDGELOOP_K8S_GPU_COUNT must not exceed it."
  type        = number
  default     = 1

  validation {
    condition     = var.accelerator_count >= 1
    error_message = "A training node needs at least one GPU."
  }
}

variable "min_nodes" {
  description = "Fewest nodes in the pool; 0 lets it scale to zero between retrains."
  type        = number
  default     = 0
}

variable "max_nodes" {
  description = "Most nodes in the pool (concurrent retrains)."
  type        = number
  default     = 2
}

variable "spot" {
  description = "Spot VMs: much cheaper, may be reclaimed (a reclaimed retrain fails and is retried by the next trigger)."
  type        = bool
  default     = false
}

variable "disk_size_gb" {
  description = "Boot disk per node: the image (torch, CUDA) plus the Job's emptyDir scratch."
  type        = number
  default     = 200
}

variable "service_account" {
  description = "Node service account email (null: the Compute Engine default)."
  type        = string
  default     = null
}
