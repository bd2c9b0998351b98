"""The planner: predicted memory and step time of every layout, the best one for a job, and
parallel.auto.
"""
