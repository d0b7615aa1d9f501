"""curvatures"""
