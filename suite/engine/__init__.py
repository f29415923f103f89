"""The split-training engine: splitting a model into parties, the wire (protocol, channel, transport), training, devices, model loading."""
