# README: an unchanged program with a use-after-free, run under ptrbridge.
python -m ptrbridge run -- python src/ptrbridge/demo_programs/gather.py
