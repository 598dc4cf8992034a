"""What an operator sees and hears of a running node: HTTP health, metrics, JSON API, status page, notifications."""
