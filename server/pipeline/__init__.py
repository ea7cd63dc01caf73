"""The retrain pipeline: trigger → snapshot → train → evaluate → gate → export → bundle → register."""
