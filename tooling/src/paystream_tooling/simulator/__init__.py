"""The retailer's third-party service, faithful to the original: gateway, log API and producer."""
