# A GKE node pool for edgeloop's training Jobs: GPU nodes that scale from zero when the server
# creates a retrain Job and back to zero after it. Plain HCL, meant to be applied from your
# own root module:
#
#   module "edgeloop_gpu_pool" {
#     source   = "./deploy/terraform/gke-gpu-pool"
#     project  = "my-project"
#     location = "europe-west4"
#     cluster  = "factory"
#   }
#
# GKE installs the NVIDIA driver (gpu_driver_installation_config) and taints GPU nodes with
# nvidia.com/gpu=present:NoSchedule, which the Jobs tolerate (EDGELOOP_K8S_TOLERATIONS
# default); they select this pool by its label (EDGELOOP_K8S_NODE_SELECTOR, see outputs).

locals {
  pool_label = { "edgeloop.io/pool" = "training" }
}

resource "google_container_node_pool" "training" {
  name           = var.name
  project        = var.project
  location       = var.location
  cluster        = var.cluster
  node_locations = var.node_locations

  initial_node_count = var.min_nodes

  autoscaling {
    total_min_node_count = var.min_nodes
    total_max_node_count = var.max_nodes
    location_policy      = "ANY" # take GPUs in whichever zone has them
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.machine_type
    spot            = var.spot
    disk_size_gb    = var.disk_size_gb
    disk_type       = "pd-balanced"
    image_type      = "COS_CONTAINERD"
    service_account = var.service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = var.accelerator_type
      count = var.accelerator_count
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    labels = local.pool_label

    metadata = {
      disable-legacy-endpoints = "true"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    # The autoscaler owns the node count.
    ignore_changes = [initial_node_count]
  }
}
