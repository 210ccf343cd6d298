"""A daemon as one node of a cluster on Ray (decision 0077): its registration and its view of the other nodes."""
