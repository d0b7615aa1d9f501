"""approximators"""
