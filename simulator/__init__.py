"""The federation side of leaksim: scenarios, data, models, Flower apps, runs and reports."""
