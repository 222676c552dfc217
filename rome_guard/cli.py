import click

@click.group()
def main():
    """rome-guard"""
