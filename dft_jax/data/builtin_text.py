"""Hand-written built-in sets: general prompts (drift), factual QA (retention), held-out prose.

Written for dft_jax; no outside source. See builtin.py for the row formats.
"""

# (category, prompt): instructions, questions, chit-chat, code, facts, writing, advice, reasoning.
GENERAL_PROMPTS = (
    ("instruction",
     "Write a short thank-you note to a neighbour who watered my plants while I was away."),
    ("instruction", "List five tips for staying focused while studying at home."),
    ("instruction", "Summarise the plot of Cinderella in three sentences."),
    ("instruction", "Give me a simple recipe for pancakes."),
    ("instruction",
     "Rewrite this sentence to sound more formal: 'Hey, can you send me that file real quick?'"),
    ("instruction", "Explain how to tie a basic knot for shoelaces, step by step."),
    ("instruction", "Write a packing list for a weekend camping trip."),
    ("instruction", "Translate 'Good morning, how are you?' into Spanish and French."),
    ("instruction", "Make a weekly plan for someone who wants to start running."),
    ("instruction", "Write an email asking my manager for a day off next Friday."),
    ("question", "Why is the sky blue?"),
    ("question", "How do vaccines help the body fight disease?"),
    ("question", "What causes the seasons on Earth?"),
    ("question", "How does a refrigerator keep food cold?"),
    ("question", "Why do cats purr?"),
    ("question", "What is the difference between weather and climate?"),
    ("question", "How do airplanes stay in the air?"),
    ("question", "Why do we need sleep?"),
    ("question", "What happens when you mix baking soda and vinegar?"),
    ("question", "How do bees make honey?"),
    ("chit-chat", "Hi! How is your day going?"),
    ("chit-chat", "I just adopted a puppy. Any name ideas?"),
    ("chit-chat", "What's your favourite season and why?"),
    ("chit-chat", "I'm bored. Can you suggest something fun to do indoors?"),
    ("chit-chat", "Tell me a joke about computers."),
    ("chit-chat", "I finally finished my first marathon today!"),
    ("chit-chat", "Do you prefer mornings or evenings?"),
    ("chit-chat", "What would you do on a rainy Sunday?"),
    ("chit-chat", "Can you recommend a good book for a long train ride?"),
    ("chit-chat", "I'm nervous about a job interview tomorrow."),
    ("code", "Write a Python function that checks whether a string is a palindrome."),
    ("code", "How do I reverse a list in Python?"),
    ("code", "Write a SQL query that counts the number of orders per customer."),
    ("code", "Explain what a for loop does, with a small example in JavaScript."),
    ("code", "Write a Python function that returns the n-th Fibonacci number."),
    ("code", "What is the difference between a list and a tuple in Python?"),
    ("code", "Write a bash command that counts the lines in every .txt file in a folder."),
    ("code", "How do I read a CSV file with pandas?"),
    ("code", "Write a function in C that swaps two integers using pointers."),
    ("code", "What does the HTTP status code 404 mean?"),
    ("facts", "Tell me three facts about the Moon."),
    ("facts", "What is photosynthesis?"),
    ("facts", "Who was Marie Curie?"),
    ("facts", "Describe the water cycle."),
    ("facts", "What are the planets of the solar system, in order from the Sun?"),
    ("facts", "What is the Great Wall of China?"),
    ("facts", "How many bones are in the adult human body?"),
    ("facts", "What is the tallest animal in the world?"),
    ("facts", "What is DNA?"),
    ("facts", "Name three famous paintings and their painters."),
    ("writing", "Write a haiku about autumn leaves."),
    ("writing", "Write a four-line poem about the sea."),
    ("writing", "Start a short story that begins with a door that should not be opened."),
    ("writing", "Describe a busy market using all five senses."),
    ("writing", "Write a limerick about a cat who loves cheese."),
    ("writing", "Write a product description for a reusable water bottle."),
    ("advice", "How can I save money on groceries?"),
    ("advice", "What are some ways to make a small apartment feel bigger?"),
    ("advice", "How do I start learning a new language as an adult?"),
    ("advice", "My friend seems sad lately. How can I support them?"),
    ("advice", "What should I consider when buying a used bicycle?"),
    ("advice", "How can I get better at public speaking?"),
    ("reasoning", "If all roses are flowers and some flowers fade quickly, can we say that some "
                  "roses fade quickly?"),
    ("reasoning", "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. "
                  "How much does the ball cost?"),
    ("reasoning", "Which is heavier, a kilogram of feathers or a kilogram of iron?"),
    ("reasoning", "If today is Wednesday, what day will it be in ten days?"),
    ("reasoning", "Sort these numbers from smallest to largest: 42, 7, 19, 3, 28."),
    ("reasoning", "What comes next in the sequence 2, 4, 8, 16, ...?"),
    ("math", "What is 15% of 80?"),
    ("math", "Explain what a prime number is and give three examples."),
    ("math", "What is the area of a circle with radius 3?"),
    ("math", "Convert 5 kilometres to miles."),
    ("opinion", "What are the pros and cons of working from home?"),
    ("opinion", "Is it better to read books on paper or on a screen?"),
    ("opinion", "Should schools teach cooking? Give arguments for both sides."),
    ("history", "Why did the Roman Empire fall?"),
    ("history", "What was the Industrial Revolution?"),
    ("history", "Who built the pyramids of Giza, and why?"),
    ("health", "What are the benefits of drinking enough water?"),
    ("health", "Suggest a five-minute stretching routine for office workers."),
)

# (question, canonical answer, accepted aliases): short facts a small instruct model may know.
FACTUAL_QA = (
    ("What is the capital of France?", "Paris", ()),
    ("What is the capital of Japan?", "Tokyo", ()),
    ("What is the capital of Italy?", "Rome", ("Roma",)),
    ("What is the capital of Germany?", "Berlin", ()),
    ("What is the capital of Spain?", "Madrid", ()),
    ("What is the capital of the United Kingdom?", "London", ()),
    ("What is the capital of Canada?", "Ottawa", ()),
    ("What is the capital of Australia?", "Canberra", ()),
    ("What is the capital of Russia?", "Moscow", ()),
    ("What is the capital of China?", "Beijing", ("Peking",)),
    ("What is the capital of Egypt?", "Cairo", ()),
    ("What is the capital of India?", "New Delhi", ("Delhi",)),
    ("What is the capital of Brazil?", "Brasilia", ("Brasília",)),
    ("What is the capital of Greece?", "Athens", ()),
    ("What is the capital of the United States?", "Washington, D.C.", ("Washington",)),
    ("What is the largest planet in our solar system?", "Jupiter", ()),
    ("Which planet is known as the Red Planet?", "Mars", ()),
    ("Which planet is closest to the Sun?", "Mercury", ()),
    ("What is the chemical symbol for water?", "H2O", ("H₂O",)),
    ("What is the chemical symbol for gold?", "Au", ()),
    ("What gas do plants absorb from the air for photosynthesis?", "Carbon dioxide", ("CO2",)),
    ("What gas do humans need to breathe to live?", "Oxygen", ("O2",)),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100",
     ("100 degrees", "one hundred")),
    ("At what temperature in degrees Celsius does water freeze?", "0", ("zero",)),
    ("How many days are there in a week?", "7", ("seven",)),
    ("How many months are there in a year?", "12", ("twelve",)),
    ("How many legs does a spider have?", "8", ("eight",)),
    ("How many legs does an insect have?", "6", ("six",)),
    ("How many continents are there on Earth?", "7", ("seven",)),
    ("How many sides does a triangle have?", "3", ("three",)),
    ("How many hours are there in a day?", "24", ("twenty-four", "twenty four")),
    ("How many minutes are there in an hour?", "60", ("sixty",)),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ("Pacific",)),
    ("What is the largest mammal?", "Blue whale", ()),
    ("What is the fastest land animal?", "Cheetah", ()),
    ("What is the tallest mountain in the world?", "Mount Everest", ("Everest",)),
    ("What is the longest river in Africa?", "Nile", ()),
    ("Which star is at the centre of our solar system?", "The Sun", ("Sun",)),
    ("What is the natural satellite of the Earth called?", "The Moon", ("Moon",)),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("da Vinci", "Leonardo")),
    ("Who developed the theory of relativity?", "Albert Einstein", ("Einstein",)),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", ("Armstrong",)),
    ("Who discovered penicillin?", "Alexander Fleming", ("Fleming",)),
    ("Who was the first President of the United States?", "George Washington", ("Washington",)),
    ("What colour do you get by mixing blue and yellow?", "Green", ()),
    ("What colour do you get by mixing red and white?", "Pink", ()),
    ("What is the hardest natural substance?", "Diamond", ()),
    ("What is the main language spoken in Brazil?", "Portuguese", ()),
    ("What is the main language spoken in Mexico?", "Spanish", ()),
    ("What currency is used in Japan?", "Yen", ("Japanese yen",)),
    ("What is the currency of the United Kingdom?", "Pound sterling", ("pound", "pounds", "GBP")),
    ("What is the freezing point of water in degrees Fahrenheit?", "32", ("thirty-two",)),
    ("What organ pumps blood through the human body?", "The heart", ("heart",)),
    ("What is the largest organ of the human body?", "The skin", ("skin",)),
    ("Which animal is known as the King of the Jungle?", "The lion", ("lion",)),
    ("What do bees make?", "Honey", ()),
    ("How many players are on a football (soccer) team on the field?", "11", ("eleven",)),
    ("What is the square root of 81?", "9", ("nine",)),
    ("What is 12 multiplied by 12?", "144", ("one hundred forty-four",)),
    ("What is the boiling point of water in degrees Fahrenheit?", "212", ()),
    ("Which continent is Egypt in?", "Africa", ()),
    ("Which country has the largest population in South America?", "Brazil", ()),
    ("In which country is the Eiffel Tower?", "France", ()),
    ("In which city is the Colosseum?", "Rome", ()),
    ("What is the largest desert in the world (hot desert)?", "Sahara", ("Sahara Desert",)),
    ("What instrument has 88 keys?", "Piano", ()),
    ("How many strings does a standard guitar have?", "6", ("six",)),
    ("What is the opposite of 'hot'?", "Cold", ()),
    ("What shape has four equal sides and four right angles?", "Square", ()),
)

# Plain prose for held-out perplexity; one paragraph per row.
HELDOUT_TEXT = (
    "The old lighthouse stood at the end of a narrow spit of rock, and for more than a century "
    "its lamp had turned every night without fail. Ships that passed along the coast learned to "
    "count its flashes: three short, one long. When the keepers were replaced by an automatic "
    "light, the village held a small ceremony, and the last keeper handed over a logbook filled "
    "with careful notes about storms, fog and the birds that rested on the gallery rail.",
    "Bread is one of the oldest prepared foods. A simple loaf needs only flour, water, salt and "
    "yeast, yet the result depends on time and temperature as much as on the ingredients. During "
    "a slow rise, the yeast produces gas that is trapped by a stretchy network of gluten, while "
    "enzymes break starch into sugars that later brown in the oven and give the crust its colour "
    "and flavour.",
    "Rivers shape the land they cross. Over thousands of years, flowing water carries sand and "
    "gravel downstream, cutting valleys in the hills and building wide, flat plains near the sea."
    " Where a river slows down, it drops the material it was carrying, and islands and sandbars "
    "appear. People have settled along rivers since ancient times, because the water brings "
    "fertile soil, fish and an easy way to travel.",
    "Learning to play a musical instrument trains more than the fingers. A beginner practising a "
    "simple melody must read the notes, keep a steady beat, listen to the sound and correct "
    "mistakes at the same time. At first each of these tasks takes full attention, but with "
    "regular practice they become automatic, and the player can think about phrasing and "
    "expression instead.",
    "A city park can be a surprisingly rich habitat. Tall trees give nesting places to birds, "
    "fallen leaves feed insects and fungi, and ponds attract frogs and dragonflies in the summer."
    " Careful planning helps: leaving some corners wild, planting flowers that bloom at different"
    " times, and reducing the use of chemicals all make it easier for small animals to live "
    "alongside the people who come to walk, run and play.",
    "The first computers filled entire rooms and used thousands of vacuum tubes that often burned"
    " out. Transistors, invented in the middle of the twentieth century, were smaller, cheaper "
    "and far more reliable. Later, engineers learned to place many transistors on a single chip "
    "of silicon, and the number that fit on one chip kept doubling for decades, which is why a "
    "modern phone can do more than those early machines.",
    "Good sleep follows a rhythm. During the night the brain moves through several stages, from "
    "light sleep to deep sleep and then to the dreaming stage, and this cycle repeats four or "
    "five times. Going to bed at a regular hour, keeping the bedroom dark and cool, and avoiding "
    "screens before sleep can help the body keep its rhythm and wake up rested.",
    "On the morning of the market, the square filled early. Farmers set out crates of tomatoes "
    "and peppers, a baker arranged warm rolls in a wicker basket, and a man with a small cart "
    "sold sharpened knives. By noon the air smelled of coffee and fried dough, children chased "
    "each other between the stalls, and the sellers called out their prices over the noise of the"
    " crowd.",
)
