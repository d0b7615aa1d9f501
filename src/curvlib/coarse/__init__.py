"""coarse"""
