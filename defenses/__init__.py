"""Defense plugins: transformations of a client's update (or its training) that cut leakage."""
