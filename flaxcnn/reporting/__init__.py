"""Reporting: metric writers, pictures, classification reports, generative scores."""
