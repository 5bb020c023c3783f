"""Sample prompts for runs that have only prompt ids (load tests, profiling).

A few MS-COCO-style captions, written for this project. Prompt text does not change a batch's cost (the
text encoders always see 77 token positions), so these stand in for real captions.
"""

SAMPLE_CAPTIONS = (
    "a man riding a wave on top of a surfboard",
    "a plate of food with broccoli and rice",
    "two giraffes standing next to each other in a field",
    "a red double decker bus driving down a street",
    "a cat sleeping on a laptop keyboard",
    "a kitchen with wooden cabinets and a white refrigerator",
    "a group of people flying kites on a beach",
    "a bowl of fruit on a wooden table",
)
