"""Cuts a query crop out of a photo (the README demo's query) and prints where it came from."""
import argparse

from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("photo")
parser.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
Image.open(args.photo).convert("RGB").crop(tuple(args.box)).save(args.out, quality=95)
print(f"query {args.out}: crop {tuple(args.box)} of {args.photo}")
