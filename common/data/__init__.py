"""Datasets: image folders, built-in sets (CIFAR-10, MNIST, the demo set)."""
