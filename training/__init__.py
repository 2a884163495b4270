"""ED-LoRA training: losses, dataset, trainable parts, the loop and the command line (file formats: ``formats/``)."""
