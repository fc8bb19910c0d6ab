"""The real-time path (messaging/): the write path, brokers, presence, the Redis Cluster bus."""
