"""damping"""
